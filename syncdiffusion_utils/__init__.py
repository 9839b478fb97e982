"""Everything around `SyncDiffusionPipeline`: command line, offline test components, benchmarks, Hub publishing.

This package may import `pipeline_syncdiffusion`; the pipeline never imports this package.
"""
