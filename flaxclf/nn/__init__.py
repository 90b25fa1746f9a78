"""Family-agnostic layers: the matmul with its written-out backward pass, dense, dropout, the attention variants,
rotary embeddings, pooling and activations. They know no encoder: flaxclf.models builds encoders from them."""
