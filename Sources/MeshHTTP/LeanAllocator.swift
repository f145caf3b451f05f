@_spi(CustomByteBufferAllocator) import NIOCore

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
/// connection was measured); with pages of their own, one or two touched pages each.
///
/// Every block carries a 16-byte header saying how it was obtained (malloc or mmap, and the mapped
/// length), so that reallocation and release take the matching path. Smaller buffers stay on malloc:
/// mapping costs two system calls, worth it only for blocks that live long.
public enum LeanAllocator {
    /// Blocks of at least this size are mapped.
    public static let threshold = 16 * 1024
    static let header = 16
    static let mappedTag: UInt64 = 0x6d65_7368_6d61_7001  // "meshmap" + 1
    static let heapTag: UInt64 = 0x6d65_7368_6865_6101  // "meshhea" + 1

    public static let allocator = ByteBufferAllocator(
        allocate: { size in LeanAllocator.allocate(size) },
        reallocate: { ptr, old, new in LeanAllocator.reallocate(ptr, old, new) },
        deallocate: { ptr in LeanAllocator.deallocate(ptr) },
        copy: { dst, src, count in dst.copyMemory(from: src, byteCount: count) }
    )

    static func pageRounded(_ n: Int) -> Int {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        return (n + page - 1) / page * page
    }

    static func allocate(_ size: Int) -> UnsafeMutableRawPointer? {
        if size >= Self.threshold {
            let length = Self.pageRounded(size + Self.header)
            guard let base = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
                base != MAP_FAILED
            else { return Self.heap(size) }
            base.storeBytes(of: Self.mappedTag, as: UInt64.self)
            base.storeBytes(of: UInt64(length), toByteOffset: 8, as: UInt64.self)
            return base + Self.header
        }
        return Self.heap(size)
    }

    static func heap(_ size: Int) -> UnsafeMutableRawPointer? {
        guard let base = malloc(size + Self.header) else { return nil }
        base.storeBytes(of: Self.heapTag, as: UInt64.self)
        base.storeBytes(of: 0, toByteOffset: 8, as: UInt64.self)
        return base + Self.header
    }

    static func deallocate(_ ptr: UnsafeMutableRawPointer) {
        let base = ptr - Self.header
        if base.load(as: UInt64.self) == Self.mappedTag {
            munmap(base, Int(base.load(fromByteOffset: 8, as: UInt64.self)))
        } else {
            free(base)
        }
    }

    static func reallocate(_ ptr: UnsafeMutableRawPointer?, _ old: Int, _ new: Int) -> UnsafeMutableRawPointer? {
        guard let ptr else { return Self.allocate(new) }
        let base = ptr - Self.header
        if base.load(as: UInt64.self) == Self.heapTag && new < Self.threshold {
            guard let grown = realloc(base, new + Self.header) else { return nil }
            return grown + Self.header
        }
        guard let fresh = Self.allocate(new) else { return nil }
        fresh.copyMemory(from: ptr, byteCount: min(old, new))
        Self.deallocate(ptr)
        return fresh
    }
}
