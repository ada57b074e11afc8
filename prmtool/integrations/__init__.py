"""Code that other tools call: verl's reward (`verl_reward.compute_score`)."""
