"""The deploy stage (not built yet: `autoglm deploy` says so and exits)."""
