"""milora.bench: the `milora-bench` tool (layer microbenchmarks and the multi-tenant generate
benchmark). Modules: cli (arguments, header, JSON, plot), layer / methods (the layer bench),
generate / models / memory (the generate bench), timing, progress, plot, op_table (the
foundation table, now `milora-bench layer --preset foundation`). See docs/benchmarks.md."""
