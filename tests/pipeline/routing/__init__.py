"""Routing and money: the router, pricing, budgets."""
