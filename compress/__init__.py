"""The compress stage (not built yet: `autoglm compress` says so and exits)."""
