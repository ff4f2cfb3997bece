"""fieldsync cdc package."""
