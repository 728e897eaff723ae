"""Memory tiers: the tier config, model footprints, hardware profiles and the placement planner."""
