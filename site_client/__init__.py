"""site_client: a hospital's Flower ClientApp (its data, releases under its ledger, local
imputation). The app object is ``site_client.app:app``."""
