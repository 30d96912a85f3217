"""Data: dataset folders and TinyImageNet, the embedded synthetic set, STL-10, the decoded-image cache, sampling
and loaders."""
