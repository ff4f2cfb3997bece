"""The ``fieldsync`` command (:mod:`fieldsync.cli`), on top of every other package."""
