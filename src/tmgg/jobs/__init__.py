"""A job's life: identity in use, plan, ledger, claims, records (the state machine).

Imports no launcher and no command: launchers hand their hooks in (DESIGN.md, Layers)."""
