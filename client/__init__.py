"""fedpref.client"""
