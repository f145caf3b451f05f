import MeshCore
import MeshTestSupport

@testable import Relay

func addr(_ ip: String, _ port: UInt16) -> STUNAddress { STUNAddress(ip: IPAddress(ip)!, port: port) }
