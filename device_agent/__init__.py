"""fieldsync device_agent package."""
