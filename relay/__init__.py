"""fieldsync relay package."""
