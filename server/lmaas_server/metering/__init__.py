"""Metering: API keys, call and token budgets, the usage ledger, rate limits (SQLite or PostgreSQL)."""
