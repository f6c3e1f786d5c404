"""coordinator: the federation's Flower ServerApp (rounds, model bank assembly and signing,
federation-level ledger view). The app object is ``coordinator.app:app``."""
