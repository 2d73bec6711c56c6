"""fedpref.model"""
