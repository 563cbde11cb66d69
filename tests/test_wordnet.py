"""The shipped WordNet 3.0 table: class ids to words, folder names to nouns, group words to
the classes they cover."""

from devise import wordnet


def test_a_tiny_imagenet_wnid_has_its_lemmas_gloss_and_hypernyms():
    goldfish = wordnet.synset("n01443537")
    assert goldfish.name == "goldfish" and "Carassius auratus" in goldfish.lemmas
    assert "freshwater" in goldfish.gloss
    viaduct = wordnet.synset("n04532670")
    bridge = wordnet.lookup("bridge")
    assert any(b in wordnet.ancestors(viaduct.wnid) for b in bridge)
    assert wordnet.is_wnid("n01443537") and not wordnet.is_wnid("goldfish")


def test_imagenet1k_is_in_classifier_order():
    ids = wordnet.imagenet1k()
    assert len(ids) == 1000 == len(set(ids))
    assert (
        wordnet.synset(ids[0]).name == "tench" and wordnet.synset(ids[-1]).name == "toilet tissue"
    )


def test_a_folder_name_gets_its_most_common_noun_sense():
    assert wordnet.synset(wordnet.noun_for_name("dress")).gloss.startswith("a one-piece garment")
    assert "feline" in wordnet.synset(wordnet.noun_for_name("cat")).gloss
    assert wordnet.synset(wordnet.noun_for_name("automobile")).name == "car"
    assert wordnet.noun_for_name("ankle_boot") is None
    assert wordnet.noun_for_name("qwzx") is None


def test_a_group_word_covers_its_hyponym_classes_only():
    goldfish, tabby, viaduct, suspension = "n01443537", "n02123045", "n04532670", "n04366367"
    classes = [goldfish, tabby, viaduct, suspension]
    bridge = wordnet.concept_for("bridge", classes)
    assert bridge is not None
    assert [wordnet.covers(bridge, c) for c in classes] == [False, False, True, True]
    # "cat" names only one of these classes: not a group among them
    assert wordnet.concept_for("cat", classes) is None
    assert wordnet.concept_for("cat", classes, min_classes=1) is not None
