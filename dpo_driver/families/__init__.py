"""Built-in environment families (dpo_driver.environment.BUILTIN)."""
