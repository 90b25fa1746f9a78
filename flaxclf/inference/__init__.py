"""Using a trained classifier: loading a run or a Hugging Face folder, predicting, and inspect's measurement of
which hidden states reach the logits."""
