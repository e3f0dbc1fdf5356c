"""kiln: an ahead-of-time compiler for large language models.

frontends/ (model files -> Relax IR + params) -> passes/ (fuse, schedule)
-> compiler/ (codegen, artifact) -> runtime/ (load artifact, generate).
"""

__version__ = "0.1.0"
