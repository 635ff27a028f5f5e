"""Everything between a video archive and uint8 token batches.

manifest (annotations -> Arrow table) -> decode (decord / PyAV) -> sampling (frame indices, ClipSpec)
-> transforms (uint8 crops) -> tokens (tubelet patchify) -> dataset (Ray Data stream / plain iterator).
`synth` writes synthetic datasets in the official K400 / SSv2 layouts. Modules import their heavy
dependencies (ray, decord, av) lazily where they can, so `import pipeline.X` stays cheap.
"""
