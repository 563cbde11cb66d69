"""The `devise` sub-commands' flags, one module per stage, importable without numpy, torch or
Ray so that `devise --help` is instant; each command imports its stage only when it runs."""
