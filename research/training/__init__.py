"""Mesh and sharding, optimizer, train state, checkpoints, the trainer loop."""
