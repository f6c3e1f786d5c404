"""Everything that reads or writes: schema, CSV tables, outputs, audit, atomic files, TOML."""
