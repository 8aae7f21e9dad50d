"""The compression passes, one module per pass and the variants it makes; each registers itself once
(:mod:`compress.registry`). The registry imports every module here in name order, which is the order of
``compress.variant_names()`` and of the knobs tune samples. A new variant is a new module here; a pass with
settings of its own also gives them a section in compress's config, where its knobs read their defaults.
"""
