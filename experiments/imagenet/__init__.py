"""The paper's ImageNet experiment (Section 4.2): models for now."""
