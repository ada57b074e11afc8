"""The algorithms, as pure functions over text and frames: step splitting, answer verification,
rollouts and the label searches, OmegaPRM, interventions, training formats. Engines are passed in."""
