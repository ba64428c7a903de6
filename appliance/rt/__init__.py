"""Radiotherapy export: RT Dose per ROI on the series' grid, linked by an RT Plan."""
