"""stc-npu node agent: a kubelet device plugin for Stream Computing NPUs."""

__version__ = "0.1.0"
