"""The `devise` sub-commands, one module per stage: its flags (defaults from devise.config), the
step from parsed flags to the stage's config, and the call. Importable without numpy, torch or
Ray, so `devise --help` is instant; a command imports its stage only when it runs."""
