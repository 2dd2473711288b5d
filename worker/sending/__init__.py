"""Purges out: batches cut when the budget allows, sent with retries, the budget shared by
demand."""
