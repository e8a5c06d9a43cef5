"""memd_client: attach to a running memd primary."""
