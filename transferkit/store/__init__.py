"""Artifact folders, backups and pictures: what a run writes."""
