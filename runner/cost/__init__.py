"""Cost: what a run cost, what on-demand would have cost, and what the money bought (DESIGN.md 4).

    ledger.py   append-only events written by the supervisor, one object each
    pricing.py  instance prices: overrides, EC2 spot history, the Pricing API, a bundled table
    report.py   the report: a pure function of ledger events, snapshots and prices
    render.py   table, JSON, CSV and self-contained HTML
    hook.py     the supervisor's side: start/heartbeat/snapshot/end records, the live cost line
"""
