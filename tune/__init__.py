"""The tune stage (not built yet: `autoglm tune` says so and exits)."""
