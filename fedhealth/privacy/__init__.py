"""Site-owned privacy: DP-SGD settings, the durable ledger, the budget's hard stop, accounting."""
