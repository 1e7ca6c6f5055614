"""Genomes: a vector of bounded numbers <-> a merge recipe.

    definition  the genome section of search.yml (GenomeDefinition)
    genome      the Genome base (gene table, bounds, groups, anchors, explain, differentiability) and
                the parameter-space layouts: WeightedGenome, SlerpGenome, GlobalParamGenome, MethodChoiceGenome
    layer_path  LayerPathGenome: a frankenmerge search
"""
