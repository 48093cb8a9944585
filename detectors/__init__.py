"""Detection core: explanations, rules as data, case building and alerts."""
