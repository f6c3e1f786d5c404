"""site_client package."""
