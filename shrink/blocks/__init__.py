"""Block-by-block machinery: where a block's weights sit while it is worked on (placement), catching
block inputs and running a model block by block (capture), what a method sees of one block
(context), the layer-wise runner, and the sparsity/quantization steps applied after a method."""
