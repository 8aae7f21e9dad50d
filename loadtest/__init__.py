"""The loadtest stage (not built yet: `autoglm loadtest` says so and exits)."""
