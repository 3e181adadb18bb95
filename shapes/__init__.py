"""The coloured-shapes world, its exact judge describe(), its count rewards and the training of its models
(shapes/world.py; python -m shapes.world --show)."""
