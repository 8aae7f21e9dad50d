"""The serve stage (not built yet: `autoglm serve` says so and exits)."""
