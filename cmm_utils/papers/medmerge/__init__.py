"""medmerge"""
