"""puzzle-gen: infer a Puzzletron ModelDescriptor for a Hugging Face model and render it.

Stages, one module each: source -> analysis (libcst, static) -> probe (meta-device build) ->
infer (DescriptorSpec) -> predicates -> render. The CLI lives in generator.cli.
"""

__version__ = "0.1.0"
