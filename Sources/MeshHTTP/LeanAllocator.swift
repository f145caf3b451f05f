@_spi(CustomByteBufferAllocator) import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

/// A `ByteBufferAllocator` for server connections that sit idle most of their life (agents' watches
/// and heartbeat connections): buffers of 16 KiB and more get pages of their own (`mmap`), so the
/// parts never written stay out of the resident set, instead of coming from the malloc heap, where
/// freed and reused chunks end up resident whole.
///
/// Why: NIOSSL keeps two buffers per TLS connection for its whole life, a plaintext read buffer of
/// 32 KiB and a BIO output buffer of 16 KiB, of which an idle watch uses a few hundred bytes. From the
/// heap they cost close to their full size each once the heap has churned (41.7 KB per idle
/// connection was measured); with pages of their own, the one page each that was written. That page
/// goes too once the connection is idle: `ConnectionBuffers` gives the pages of a connection's TLS
/// buffers back (`madvise(MADV_DONTNEED)`) when their bytes are dead.
///
/// A mapped block starts on a page boundary and has no header (so that none of its pages must stay
/// resident): a registry of mapped addresses and lengths tells mapped blocks from heap ones, which
/// are plain `malloc` blocks. Only page-aligned addresses are looked up. Smaller buffers stay on
/// malloc: mapping costs two system calls, worth it only for blocks that live long.
public enum LeanAllocator {
    /// Blocks of at least this size are mapped.
    public static let threshold = 16 * 1024
    static let pageSize = Int(sysconf(Int32(_SC_PAGESIZE)))
    struct Block {
        var length: Int
        /// The connection whose idle release covers this block (see `ConnectionBuffers`).
        var owner: ConnectionBuffers?
    }

    /// The mapped blocks by address.
    private static let mapped = Mutex<[UInt: Block]>([:])
    /// The connection adopting the blocks this thread maps now (`ConnectionBuffers.tracking`).
    static let adopting = ThreadSpecificVariable<ConnectionBuffers>()

    public static let allocator = ByteBufferAllocator(
        allocate: { size in LeanAllocator.allocate(size) },
        reallocate: { ptr, old, new in LeanAllocator.reallocate(ptr, old, new) },
        deallocate: { ptr in LeanAllocator.deallocate(ptr) },
        copy: { dst, src, count in dst.copyMemory(from: src, byteCount: count) }
    )

    static func pageRounded(_ n: Int) -> Int {
        (n + Self.pageSize - 1) / Self.pageSize * Self.pageSize
    }

    /// Mapped blocks alive now (for tests and figures).
    public static var mappedBlocks: Int { Self.mapped.withLock { $0.count } }

    /// The length of the mapping `ptr` starts, nil for a heap block.
    static func mappedLength(_ ptr: UnsafeMutableRawPointer) -> Int? {
        let address = UInt(bitPattern: ptr)
        guard address % UInt(Self.pageSize) == 0 else { return nil }
        return Self.mapped.withLock { $0[address]?.length }
    }

    static func allocate(_ size: Int) -> UnsafeMutableRawPointer? {
        Self.allocate(size, owner: size >= Self.threshold ? Self.adopting.currentValue : nil)
    }

    static func allocate(_ size: Int, owner: ConnectionBuffers?) -> UnsafeMutableRawPointer? {
        if size >= Self.threshold {
            let length = Self.pageRounded(size)
            if let base = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                base != MAP_FAILED
            {
                Self.mapped.withLock { $0[UInt(bitPattern: base)] = Block(length: length, owner: owner) }
                owner?.adopt(base, length)
                return base
            }
        }
        return malloc(size)
    }

    static func deallocate(_ ptr: UnsafeMutableRawPointer) {
        let address = UInt(bitPattern: ptr)
        if address % UInt(Self.pageSize) == 0, let block = Self.mapped.withLock({ $0.removeValue(forKey: address) }) {
            // The owner forgets it before it is unmapped, so its release never advises a dead mapping.
            block.owner?.forget(ptr)
            munmap(ptr, block.length)
        } else {
            free(ptr)
        }
    }

    static func reallocate(_ ptr: UnsafeMutableRawPointer?, _ old: Int, _ new: Int) -> UnsafeMutableRawPointer? {
        guard let ptr else { return Self.allocate(new) }
        let address = UInt(bitPattern: ptr)
        let block = address % UInt(Self.pageSize) == 0 ? Self.mapped.withLock { $0[address] } : nil
        if block == nil && new < Self.threshold { return realloc(ptr, new) }
        if let block, new <= block.length, new >= Self.threshold { return ptr }
        // A block of a connection's TLS buffers stays one when it moves.
        guard
            let fresh = Self.allocate(
                new,
                owner: block?.owner ?? (new >= Self.threshold ? Self.adopting.currentValue : nil)
            )
        else { return nil }
        fresh.copyMemory(from: ptr, byteCount: min(old, new))
        Self.deallocate(ptr)
        return fresh
    }
}
