"""fedpref.safety_policy"""
