"""Shared tensor maths: the model body/head split and the statistics losses read."""
