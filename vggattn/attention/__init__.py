"""What attention a model computes: finding it (trace), reading it (adapters), its numbers (readouts)."""
