"""Genomes: a vector of bounded numbers <-> a merge recipe (search_spaces.genome)."""
