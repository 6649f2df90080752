"""The seams where this project touches other libraries' internals: one module per library.

Each module names the library (`PACKAGE`) and the versions its uses were checked on (`CHECKED`, a PEP 440
specifier); nothing outside this package reaches into a library's private names.
"""
